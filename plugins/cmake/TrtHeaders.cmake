# tq_trt_include_dir(<out_var>): a directory holding NvInfer.h / NvInferRuntime.h (TensorRT 10.x
# plugin API headers); a configuration error saying both ways to get them when none can be had.
#
# 1. TRT_INCLUDE_DIR (CMake cache variable or environment variable), e.g. the include/ folder of
#    a TensorRT release; used as is.
# 2. Otherwise `pip download --no-deps kernel-lens==2.0.1` (Apache-2.0) into the build tree and
#    keep only its TensorRT 10.14 headers (kernel_lens/include/tensorrt/). Nothing is linked from
#    TensorRT: a plugin library only needs the headers' interface classes.
set(TQ_TRT_PIP_PACKAGE "kernel-lens==2.0.1" CACHE STRING "pip package with the TensorRT headers")
set(TQ_TRT_PIP_HEADERS "kernel_lens/include/tensorrt" CACHE STRING "Header folder inside that wheel")
set(TRT_INCLUDE_DIR "" CACHE PATH "Directory with NvInferRuntime.h (skips the pip download)")

function(_tq_trt_headers_ok dir out_var)
  if(EXISTS "${dir}/NvInferRuntime.h" AND EXISTS "${dir}/NvInferPluginBase.h")
    set(${out_var} TRUE PARENT_SCOPE)
  else()
    set(${out_var} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(tq_trt_include_dir out_var)
  set(${out_var} "" PARENT_SCOPE)
  set(given "${TRT_INCLUDE_DIR}")
  if(NOT given AND DEFINED ENV{TRT_INCLUDE_DIR})
    set(given "$ENV{TRT_INCLUDE_DIR}")
  endif()
  if(given)
    foreach(candidate "${given}" "${given}/tensorrt" "${given}/include")
      _tq_trt_headers_ok("${candidate}" ok)
      if(ok)
        message(STATUS "TensorRT headers: ${candidate} (TRT_INCLUDE_DIR)")
        set(${out_var} "${candidate}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
    message(FATAL_ERROR "TRT_INCLUDE_DIR=${given} has no NvInferRuntime.h / NvInferPluginBase.h (TensorRT >= 10). "
                        "Point it at a TensorRT include/ folder, or unset it to fetch the headers with "
                        "`pip download --no-deps ${TQ_TRT_PIP_PACKAGE}`.")
  endif()

  set(dest "${CMAKE_BINARY_DIR}/_deps/tensorrt_headers")
  _tq_trt_headers_ok("${dest}" ok)
  if(ok)
    set(${out_var} "${dest}" PARENT_SCOPE)
    return()
  endif()

  # The interpreter that runs the build (scikit-build-core sets Python_EXECUTABLE), else python3.
  set(pythons "")
  foreach(p "${Python_EXECUTABLE}" "${Python3_EXECUTABLE}")
    if(p)
      list(APPEND pythons "${p}")
    endif()
  endforeach()
  find_program(TQ_TRT_PYTHON NAMES python3 python)
  if(TQ_TRT_PYTHON)
    list(APPEND pythons "${TQ_TRT_PYTHON}")
  endif()
  list(REMOVE_DUPLICATES pythons)
  # Inside pip's isolated build environment (`pip wheel .`, `pip install .`) the outer pip's
  # PYTHONPATH overlay and trackers are set: each interpreter runs isolated (-I) with them unset,
  # so it sees its own site-packages and pip. A pip executable on PATH is the last resort.
  find_program(TQ_TRT_PIP NAMES pip3 pip)
  set(clean_env "${CMAKE_COMMAND}|-E|env|--unset=PYTHONPATH|--unset=PYTHONHOME|--unset=PYTHONNOUSERSITE|--unset=PIP_BUILD_TRACKER|--unset=PIP_REQ_TRACKER|--unset=PYTHONSAFEPATH")
  set(download "${CMAKE_BINARY_DIR}/_deps/tensorrt_pip")
  set(wheels "")
  set(errors "")
  set(pip_commands "")
  foreach(python IN LISTS pythons)
    list(APPEND pip_commands "${clean_env}|${python}|-I|-m|pip")
  endforeach()
  if(TQ_TRT_PIP)
    list(APPEND pip_commands "${clean_env}|${TQ_TRT_PIP}")
  endif()
  foreach(pip_command IN LISTS pip_commands)
    string(REPLACE "|" ";" pip_argv "${pip_command}")
    file(REMOVE_RECURSE "${download}")
    file(MAKE_DIRECTORY "${download}")
    string(REPLACE "${clean_env}|" "" pip_shown "${pip_command}")
    string(REPLACE "|" " " pip_shown "${pip_shown}")
    message(STATUS "Fetching TensorRT headers: ${pip_shown} download --no-deps ${TQ_TRT_PIP_PACKAGE}")
    execute_process(
      COMMAND ${pip_argv} download --no-deps --only-binary=:all: --disable-pip-version-check -q
              "${TQ_TRT_PIP_PACKAGE}" -d "${download}"
      RESULT_VARIABLE rc
      OUTPUT_VARIABLE pip_out
      ERROR_VARIABLE pip_err)
    file(GLOB wheels "${download}/*.whl")
    if(rc EQUAL 0 AND wheels)
      break()
    endif()
    string(APPEND errors "\n${pip_shown}: exit ${rc}: ${pip_err}")
    set(wheels "")
  endforeach()
  if(NOT wheels)
    message(FATAL_ERROR "The TensorRT plugins need the TensorRT headers and `pip download --no-deps ${TQ_TRT_PIP_PACKAGE}` "
                        "failed with every pip found:${errors}\nSet TRT_INCLUDE_DIR to a TensorRT include/ folder, or "
                        "build without the plugins: -DTQ_DEPLOY_TRT=OFF (pip: -Ccmake.define.TQ_DEPLOY_TRT=OFF).")
  endif()
  list(GET wheels 0 wheel)
  file(ARCHIVE_EXTRACT INPUT "${wheel}" DESTINATION "${download}/x" PATTERNS "${TQ_TRT_PIP_HEADERS}/*.h")
  file(GLOB headers "${download}/x/${TQ_TRT_PIP_HEADERS}/*.h")
  if(NOT headers)
    message(FATAL_ERROR "${wheel} has no headers under ${TQ_TRT_PIP_HEADERS}; set TRT_INCLUDE_DIR, or build "
                        "with -DTQ_DEPLOY_TRT=OFF.")
  endif()
  file(MAKE_DIRECTORY "${dest}")
  file(COPY ${headers} DESTINATION "${dest}")
  file(REMOVE_RECURSE "${download}")
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
