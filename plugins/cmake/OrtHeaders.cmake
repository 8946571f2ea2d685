# tq_ort_include_dir(<out_var>): a directory holding the ONNX Runtime C/C++ API headers.
#
# 1. ORT_INCLUDE_DIR (CMake cache variable or environment variable), e.g. the include/ folder of
#    an onnxruntime release archive; used as is.
# 2. Otherwise `npm pack com.github.asus4.onnxruntime@0.4.9` (MIT) into the build tree and keep
#    only its headers (ORT_API_VERSION 29): no PyPI or Debian package ships them. The library
#    then needs onnxruntime >= 1.29 at run time.
set(TQ_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9" CACHE STRING "npm package with the ORT headers")
set(TQ_ORT_NPM_HEADERS "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers"
    CACHE STRING "Header folder inside that npm package")
set(ORT_INCLUDE_DIR "" CACHE PATH "Directory with onnxruntime_cxx_api.h (skips the npm download)")

function(_tq_ort_headers_ok dir out_var)
  if(EXISTS "${dir}/onnxruntime_cxx_api.h" AND EXISTS "${dir}/onnxruntime_c_api.h")
    set(${out_var} TRUE PARENT_SCOPE)
  else()
    set(${out_var} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(tq_ort_include_dir out_var)
  set(given "${ORT_INCLUDE_DIR}")
  if(NOT given AND DEFINED ENV{ORT_INCLUDE_DIR})
    set(given "$ENV{ORT_INCLUDE_DIR}")
  endif()
  if(given)
    foreach(candidate "${given}" "${given}/onnxruntime" "${given}/onnxruntime/core/session")
      _tq_ort_headers_ok("${candidate}" ok)
      if(ok)
        message(STATUS "ONNX Runtime headers: ${candidate} (ORT_INCLUDE_DIR)")
        set(${out_var} "${candidate}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${given} has no onnxruntime_cxx_api.h / onnxruntime_c_api.h. "
                        "Point it at the include/ folder of an onnxruntime release, or unset it to fetch "
                        "the headers with `npm pack ${TQ_ORT_NPM_PACKAGE}`.")
  endif()

  set(dest "${CMAKE_BINARY_DIR}/_deps/onnxruntime_headers")
  _tq_ort_headers_ok("${dest}" ok)
  if(ok)
    set(${out_var} "${dest}" PARENT_SCOPE)
    return()
  endif()

  find_program(TQ_NPM_EXECUTABLE npm)
  if(NOT TQ_NPM_EXECUTABLE)
    message(FATAL_ERROR "The ONNX Runtime C/C++ API headers are needed to build the custom-op library, and "
                        "neither way to get them works: ORT_INCLUDE_DIR is not set and `npm` was not found. "
                        "Either install npm (Debian/Ubuntu: apt-get install npm) so the build can run "
                        "`npm pack ${TQ_ORT_NPM_PACKAGE}`, or set ORT_INCLUDE_DIR (env or -D) to the include/ "
                        "folder of an onnxruntime release archive.")
  endif()
  set(download "${CMAKE_BINARY_DIR}/_deps/onnxruntime_npm")
  file(REMOVE_RECURSE "${download}")
  file(MAKE_DIRECTORY "${download}")
  message(STATUS "Fetching ONNX Runtime headers: npm pack ${TQ_ORT_NPM_PACKAGE}")
  execute_process(
    COMMAND "${TQ_NPM_EXECUTABLE}" pack "${TQ_ORT_NPM_PACKAGE}" --silent
    WORKING_DIRECTORY "${download}"
    RESULT_VARIABLE rc
    OUTPUT_VARIABLE npm_out
    ERROR_VARIABLE npm_err)
  file(GLOB tarballs "${download}/*.tgz")
  if(NOT rc EQUAL 0 OR NOT tarballs)
    message(FATAL_ERROR "`npm pack ${TQ_ORT_NPM_PACKAGE}` failed (exit ${rc}): ${npm_err}\n"
                        "Check that the npm registry is reachable, or set ORT_INCLUDE_DIR (env or -D) to the "
                        "include/ folder of an onnxruntime release archive.")
  endif()
  list(GET tarballs 0 tarball)
  file(ARCHIVE_EXTRACT INPUT "${tarball}" DESTINATION "${download}/x" PATTERNS "${TQ_ORT_NPM_HEADERS}/*.h")
  file(GLOB headers "${download}/x/${TQ_ORT_NPM_HEADERS}/*.h")
  if(NOT headers)
    message(FATAL_ERROR "${tarball} has no headers under ${TQ_ORT_NPM_HEADERS}; set ORT_INCLUDE_DIR instead.")
  endif()
  file(MAKE_DIRECTORY "${dest}")
  file(COPY ${headers} DESTINATION "${dest}")
  file(REMOVE_RECURSE "${download}")  # the package is ~150 MB of binaries we do not need
  _tq_ort_headers_ok("${dest}" ok)
  if(NOT ok)
    message(FATAL_ERROR "No onnxruntime_cxx_api.h in ${TQ_ORT_NPM_PACKAGE}; set ORT_INCLUDE_DIR instead.")
  endif()
  message(STATUS "ONNX Runtime headers: ${dest} (from npm pack ${TQ_ORT_NPM_PACKAGE})")
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
