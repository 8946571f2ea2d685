#include "tq_trt_log.h"

#include <atomic>
#include <cstdio>

namespace tq_trt {
namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};
}

void set_logger_finder(nvinfer1::ILoggerFinder* finder) { g_finder.store(finder); }

void log(nvinfer1::ILogger::Severity severity, const std::string& message) {
  const std::string text = "[turboquant plugin] " + message;
  nvinfer1::ILoggerFinder* finder = g_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger) {
    logger->log(severity, text.c_str());
  } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
    std::fprintf(stderr, "%s\n", text.c_str());
  }
}

}  // namespace tq_trt
