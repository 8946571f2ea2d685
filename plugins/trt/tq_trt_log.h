// Logging for the TensorRT plugins through the logger TensorRT hands over with setLoggerFinder
// (stderr when no finder was set, e.g. in the test harness).
#pragma once

#include <string>

#include "NvInferRuntime.h"

namespace tq_trt {

void set_logger_finder(nvinfer1::ILoggerFinder* finder);
void log(nvinfer1::ILogger::Severity severity, const std::string& message);
inline void log_error(const std::string& message) { log(nvinfer1::ILogger::Severity::kERROR, message); }

}  // namespace tq_trt
