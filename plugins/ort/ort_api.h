// The one place that includes the ONNX Runtime C++ API. The library is loaded by
// onnxruntime itself, which hands us its OrtApi in RegisterCustomOps (manual init), so
// nothing here links against libonnxruntime.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT
