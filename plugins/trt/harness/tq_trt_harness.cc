// A test driver for the TurboQuant TensorRT plugins without TensorRT: it does to a plugin what
// TensorRT does around an engine, on caller-owned device pointers.
//
//   dlopen(plugin library) -> getCreators() -> the creator named op_name in "turboquant"
//   build phase:   createPlugin(kBUILD) -> getNbOutputs / getOutputDataTypes /
//                  supportsFormatCombination (each position) -> configurePlugin
//   runtime phase: getFieldsToSerialize -> createPlugin(kRUNTIME) from those fields (as engine
//                  deserialization does) -> attachToContext -> onShapeChange -> enqueue(stream)
//
// The workspace is the caller's, as TensorRT's is: getWorkspaceSize is reported through
// workspace_needed and enqueue refuses a smaller one. repeat > 1 enqueues that many times
// back to back (what a benchmark times, minus the setup above).
// Shape expressions (getOutputShapes) need TensorRT's IExprBuilder and are exercised by the
// engine builds in tests/test_trt_build.py instead. C API for ctypes (tq_deploy.runtime.tensorrt).
// With skip_enqueue != 0 it stops before enqueue, so every refusal path runs without a GPU.
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "NvInferRuntime.h"

namespace {

using namespace nvinfer1;
using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);

struct PluginDeleter {
  void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

int fail(char* message, int message_len, const std::string& text) {
  if (message && message_len > 0) std::snprintf(message, static_cast<size_t>(message_len), "%s", text.c_str());
  return 1;
}

Dims make_dims(int rank, const int64_t* d) {
  Dims dims{};
  dims.nbDims = rank;
  for (int i = 0; i < rank && i < Dims::MAX_DIMS; ++i) dims.d[i] = d[i];
  return dims;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int tq_trt_harness_enqueue(
    const char* plugin_library, const char* op_name, int nb_fields, const char* const* field_names,
    const double* field_values, const int* field_is_float, int nb_inputs, const int* input_types,
    const int* input_ranks, const int64_t* input_dims, const void* const* inputs, int nb_outputs,
    const int* output_types, const int* output_ranks, const int64_t* output_dims, void* const* outputs, void* stream,
    void* workspace, size_t workspace_bytes, int repeat, size_t* workspace_needed, int skip_enqueue, char* message,
    int message_len) {
  void* handle = dlopen(plugin_library, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return fail(message, message_len, std::string("dlopen failed: ") + dlerror());
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
  if (!get_creators) return fail(message, message_len, "the library exports no getCreators");
  int32_t nb_creators = 0;
  IPluginCreatorInterface* const* creators = get_creators(nb_creators);
  IPluginCreatorV3One* creator = nullptr;
  for (int32_t i = 0; i < nb_creators; ++i) {
    if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    if (std::strcmp(c->getPluginName(), op_name) == 0 && std::strcmp(c->getPluginNamespace(), "turboquant") == 0 &&
        std::strcmp(c->getPluginVersion(), "1") == 0)
      creator = c;
  }
  if (!creator) return fail(message, message_len, std::string("no V3One creator turboquant::") + op_name + " v1");

  // Attributes as TensorRT's ONNX parser passes them: int32 or float32 scalars.
  std::vector<int32_t> ints(nb_fields);
  std::vector<float> floats(nb_fields);
  std::vector<PluginField> fields;
  for (int i = 0; i < nb_fields; ++i) {
    if (field_is_float[i]) {
      floats[i] = static_cast<float>(field_values[i]);
      fields.emplace_back(field_names[i], &floats[i], PluginFieldType::kFLOAT32, 1);
    } else {
      ints[i] = static_cast<int32_t>(field_values[i]);
      fields.emplace_back(field_names[i], &ints[i], PluginFieldType::kINT32, 1);
    }
  }
  PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};

  PluginPtr build(creator->createPlugin(op_name, &fc, TensorRTPhase::kBUILD));
  if (!build) return fail(message, message_len, "createPlugin(kBUILD) returned null (bad attributes?)");
  auto* core = static_cast<IPluginV3OneCore*>(build->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* b = static_cast<IPluginV3OneBuild*>(build->getCapabilityInterface(PluginCapabilityType::kBUILD));
  if (!core || !b) return fail(message, message_len, "missing core/build capability");
  if (std::strcmp(core->getPluginName(), op_name) != 0) return fail(message, message_len, "plugin name mismatch");
  if (b->getNbOutputs() != nb_outputs)
    return fail(message, message_len, "getNbOutputs=" + std::to_string(b->getNbOutputs()) + ", expected " +
                                          std::to_string(nb_outputs));

  const int nb = nb_inputs + nb_outputs;
  std::vector<DynamicPluginTensorDesc> dyn(nb);
  std::vector<PluginTensorDesc> desc(nb);
  std::vector<DataType> in_types(nb_inputs), out_types(nb_outputs);
  for (int i = 0; i < nb; ++i) {
    const bool is_in = i < nb_inputs;
    const int k = is_in ? i : i - nb_inputs;
    const Dims dims = is_in ? make_dims(input_ranks[k], input_dims + 8 * k) : make_dims(output_ranks[k], output_dims + 8 * k);
    desc[i].dims = dims;
    desc[i].type = static_cast<DataType>(is_in ? input_types[k] : output_types[k]);
    desc[i].format = TensorFormat::kLINEAR;
    desc[i].scale = 1.f;
    dyn[i].desc = desc[i];
    dyn[i].min = dyn[i].max = dyn[i].opt = dims;
    if (is_in) in_types[k] = desc[i].type;
  }
  if (b->getOutputDataTypes(out_types.data(), nb_outputs, in_types.data(), nb_inputs) != 0)
    return fail(message, message_len, "getOutputDataTypes failed");
  for (int o = 0; o < nb_outputs; ++o)
    if (out_types[o] != desc[nb_inputs + o].type)
      return fail(message, message_len, "getOutputDataTypes: output " + std::to_string(o) + " has type " +
                                            std::to_string(static_cast<int>(out_types[o])) + ", expected " +
                                            std::to_string(output_types[o]));
  for (int pos = 0; pos < nb; ++pos)
    if (!b->supportsFormatCombination(pos, dyn.data(), nb_inputs, nb_outputs))
      return fail(message, message_len, "supportsFormatCombination rejects position " + std::to_string(pos));
  if (b->configurePlugin(dyn.data(), nb_inputs, dyn.data() + nb_inputs, nb_outputs) != 0)
    return fail(message, message_len, "configurePlugin rejected the shapes (see the plugin's log on stderr)");

  const size_t needed = b->getWorkspaceSize(dyn.data(), nb_inputs, dyn.data() + nb_inputs, nb_outputs);
  if (workspace_needed) *workspace_needed = needed;

  // Runtime phase: a fresh plugin from the serialized fields, as engine deserialization makes it.
  auto* build_rt = static_cast<IPluginV3OneRuntime*>(build->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  const PluginFieldCollection* saved = build_rt->getFieldsToSerialize();
  PluginPtr deserialized(creator->createPlugin(op_name, saved, TensorRTPhase::kRUNTIME));
  if (!deserialized) return fail(message, message_len, "createPlugin(kRUNTIME) from the serialized fields failed");
  auto* drt = static_cast<IPluginV3OneRuntime*>(deserialized->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginPtr attached(drt->attachToContext(nullptr));
  if (!attached) return fail(message, message_len, "attachToContext returned null");
  auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (rt->onShapeChange(desc.data(), nb_inputs, desc.data() + nb_inputs, nb_outputs) != 0)
    return fail(message, message_len, "onShapeChange rejected the shapes (see the plugin's log on stderr)");
  if (skip_enqueue) return 0;  // everything but the launch: needs no GPU
  if (workspace_bytes < needed)
    return fail(message, message_len, "workspace of " + std::to_string(workspace_bytes) + " bytes, getWorkspaceSize asks " +
                                          std::to_string(needed));
  for (int i = 0; i < (repeat > 1 ? repeat : 1); ++i)
    if (rt->enqueue(desc.data(), desc.data() + nb_inputs, inputs, outputs, needed ? workspace : nullptr,
                    static_cast<cudaStream_t>(stream)) != 0)
      return fail(message, message_len, "enqueue failed (see the plugin's log on stderr)");
  return 0;
}
