// The library's single entry point: onnxruntime calls RegisterCustomOps when a session is
// created with SessionOptions.register_custom_ops_library(path).
#include <mutex>

#include "ort_op_base.h"

namespace tq_ort {

std::vector<const OrtCustomOp*> all_ops() {
  // Created once and never freed: sessions keep pointers to them for the process lifetime.
  static const std::vector<const OrtCustomOp*> ops = [] {
    std::vector<const OrtCustomOp*> v;
    for (auto t : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16}) {
      v.push_back(make_encode_op(t));
      v.push_back(make_cache_update_op(t));
      v.push_back(make_paged_attention_op(t));
    }
    v.push_back(make_decode_op());
    return v;
  }();
  return ops;
}

}  // namespace tq_ort

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Too old a runtime for the headers we were built against; version 1 of the API always
    // exists and is enough to report that.
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("tq_deploy ORT library: onnxruntime ") + api_base->GetVersionString() +
                      " does not provide ORT API version " + std::to_string(ORT_API_VERSION) +
                      " that this library was built against; upgrade onnxruntime or rebuild the library with "
                      "headers of your onnxruntime (ORT_INCLUDE_DIR)";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);

  // Each session options object gets its own domain object; all of them share the static ops
  // and must outlive every session, so they are kept until the process exits.
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    Ort::CustomOpDomain domain(tq_ort::kDomain);
    for (const OrtCustomOp* op : tq_ort::all_ops()) domain.Add(op);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
