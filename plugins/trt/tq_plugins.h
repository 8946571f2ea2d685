// The TurboQuant plugins, one class per op of tq_deploy/ops.py.
#pragma once

#include <new>
#include <utility>

#include "tq_plugin_base.h"

namespace tq_trt {

extern const OpDef kEncodeDef;
extern const OpDef kDecodeDef;
extern const OpDef kCacheUpdateDef;
extern const OpDef kPagedAttentionDef;

#define TQ_TRT_PLUGIN(Class, def)                                                                        \
  class Class final : public TQPlugin {                                                                  \
   public:                                                                                               \
    explicit Class(Attrs attrs) : TQPlugin(def, std::move(attrs)) {}                                     \
    nvinfer1::IPluginV3* clone() noexcept override { return new (std::nothrow) Class(attrs_); }          \
                                                                                                         \
   protected:                                                                                            \
    bool output_shapes(const nvinfer1::DimsExprs* inputs, nvinfer1::DimsExprs* outputs,                  \
                       nvinfer1::IExprBuilder& builder) const override;                                  \
    std::string check_shapes(const nvinfer1::Dims* inputs) const override;                               \
    int run(const nvinfer1::PluginTensorDesc* input_desc, const void* const* inputs, void* const* outputs, \
            void* workspace, cudaStream_t stream) override;

TQ_TRT_PLUGIN(EncodePlugin, kEncodeDef)
};
TQ_TRT_PLUGIN(DecodePlugin, kDecodeDef)
};
TQ_TRT_PLUGIN(PagedAttentionPlugin, kPagedAttentionDef)
  size_t workspace_bytes(const nvinfer1::DynamicPluginTensorDesc* inputs) const override;
};
TQ_TRT_PLUGIN(CacheUpdatePlugin, kCacheUpdateDef)
  size_t workspace_bytes(const nvinfer1::DynamicPluginTensorDesc* inputs) const override;
  // Output o (k_codes, k_norms, v_codes, v_norms) is read-modify-write of input 3 + o.
  int32_t aliased_input(int32_t output_index) const override {
    return output_index >= 0 && output_index < 4 ? 3 + output_index : -1;
  }
};

#undef TQ_TRT_PLUGIN

}  // namespace tq_trt
