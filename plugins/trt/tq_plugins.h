// The TurboQuant plugins: one class per op of the contract, expanded from tq_op_list.h (generated
// from tq_deploy/ops.py). Each op's shape hooks are defined in tq_<stem>_plugin.cc; the workspace
// size (for the profile's largest shapes) and the launch are the same for every op: the call
// filled through CallIo, then tq_cuda_<stem> (through tq_cuda::Launcher, which keeps the paged
// attention's plan per shape).
#pragma once

#include <new>
#include <utility>

#include "tq_cuda_launcher.h"
#include "tq_op_list.h"
#include "tq_plugin_base.h"

namespace tq_trt {

// the types every op's shape hooks take
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

#define TQ_TRT_PLUGIN(stem, Pascal, float_types, norm_types)                                                         \
  class Pascal##Plugin final : public TQPlugin {                                                         \
   public:                                                                                               \
    explicit Pascal##Plugin(Attrs attrs) : TQPlugin(def(), std::move(attrs)) {}                         \
    static const OpDef& def() { return def_of<&tq_ops::stem::kOp>(); }                                   \
    nvinfer1::IPluginV3* clone() noexcept override { return new (std::nothrow) Pascal##Plugin(attrs_); } \
                                                                                                         \
   protected:                                                                                            \
    bool output_shapes(const nvinfer1::DimsExprs* inputs, nvinfer1::DimsExprs* outputs,                  \
                       nvinfer1::IExprBuilder& builder) const override;                                  \
    std::string check_shapes(const nvinfer1::Dims* inputs, int32_t nb_inputs) const override;            \
    size_t workspace_bytes(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb) const override { \
      tq_##stem##_call call{};                                                                           \
      tq_ops::stem::fill(call, CallIo(def(), inputs, nb, attrs_));                                       \
      return tq_cuda::workspace(&call);                                                                  \
    }                                                                                                    \
    int run(const nvinfer1::PluginTensorDesc* desc, const void* const* inputs, void* const* outputs,     \
            void* workspace, cudaStream_t stream) override {                                             \
      tq_##stem##_call call{};                                                                           \
      tq_ops::stem::fill(call, CallIo(def(), desc, nb_inputs_, inputs, outputs, attrs_));                \
      call.workspace = workspace;                                                                        \
      call.workspace_bytes = launcher_.workspace(call);                                                  \
      call.stream = stream;                                                                              \
      return launcher_.run(call);                                                                        \
    }                                                                                                    \
                                                                                                         \
   private:                                                                                              \
    tq_cuda::Launcher<tq_##stem##_call> launcher_;                                                       \
  };
TQ_FOR_EACH_OP(TQ_TRT_PLUGIN)
#undef TQ_TRT_PLUGIN

}  // namespace tq_trt
