# Fetch, verify, extract and patch the llama.cpp source that edgemerge builds.
#
# The only llama.cpp source reachable from our machines is the copy vendored
# in the llama-cpp-python sdist on PyPI. We pin that sdist by sha256 and keep
# it in a cache outside the build tree, so a rebuild (or a fresh clone on the
# same machine) downloads nothing. The patched tree lives inside the build
# directory, so ccache sees the same relative paths on every clone.

set(EDGEMERGE_LLAMA_CPP_PYTHON_VERSION "0.3.36")
set(EDGEMERGE_LLAMA_SDIST_SHA256
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
set(_sdist_stem "llama_cpp_python-${EDGEMERGE_LLAMA_CPP_PYTHON_VERSION}")

if(DEFINED ENV{EDGEMERGE_CACHE_DIR})
  set(EDGEMERGE_CACHE_DIR "$ENV{EDGEMERGE_CACHE_DIR}")
elseif(DEFINED ENV{XDG_CACHE_HOME})
  set(EDGEMERGE_CACHE_DIR "$ENV{XDG_CACHE_HOME}/edgemerge")
else()
  set(EDGEMERGE_CACHE_DIR "$ENV{HOME}/.cache/edgemerge")
endif()
set(_sdist_dir "${EDGEMERGE_CACHE_DIR}/sdist")
set(_sdist "${_sdist_dir}/${_sdist_stem}.tar.gz")

function(_edgemerge_sdist_ok out)
  set(${out} FALSE PARENT_SCOPE)
  if(EXISTS "${_sdist}")
    file(SHA256 "${_sdist}" _have)
    if(_have STREQUAL EDGEMERGE_LLAMA_SDIST_SHA256)
      set(${out} TRUE PARENT_SCOPE)
    else()
      message(WARNING "edgemerge: cached ${_sdist} has sha256 ${_have}, "
                      "expected ${EDGEMERGE_LLAMA_SDIST_SHA256}; fetching again")
      file(REMOVE "${_sdist}")
    endif()
  endif()
endfunction()

_edgemerge_sdist_ok(_ok)
if(NOT _ok)
  find_package(Python COMPONENTS Interpreter REQUIRED)
  set(_dl "${_sdist_dir}/download")
  file(REMOVE_RECURSE "${_dl}")
  message(STATUS "edgemerge: fetching llama-cpp-python==${EDGEMERGE_LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m pip download --quiet --no-deps
            --no-build-isolation --no-binary llama-cpp-python
            "llama-cpp-python==${EDGEMERGE_LLAMA_CPP_PYTHON_VERSION}" -d "${_dl}"
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_dl}/${_sdist_stem}.tar.gz")
    message(FATAL_ERROR
      "edgemerge: could not download the llama-cpp-python "
      "${EDGEMERGE_LLAMA_CPP_PYTHON_VERSION} sdist with pip (exit ${_rc}). "
      "Check that PyPI is reachable, or place ${_sdist_stem}.tar.gz in ${_sdist_dir}.")
  endif()
  file(RENAME "${_dl}/${_sdist_stem}.tar.gz" "${_sdist}")
  file(REMOVE_RECURSE "${_dl}")
  _edgemerge_sdist_ok(_ok)
  if(NOT _ok)
    message(FATAL_ERROR "edgemerge: the downloaded sdist does not match the pinned sha256 "
                        "${EDGEMERGE_LLAMA_SDIST_SHA256}; refusing to build from it.")
  endif()
endif()

# The stamp names the sdist and every patch's hash: any change re-extracts.
file(GLOB EDGEMERGE_PATCHES "${CMAKE_CURRENT_SOURCE_DIR}/native/patches/*.patch")
list(SORT EDGEMERGE_PATCHES)
set(_stamp_text "${EDGEMERGE_LLAMA_SDIST_SHA256}\n")
foreach(_p IN LISTS EDGEMERGE_PATCHES)
  file(SHA256 "${_p}" _h)
  get_filename_component(_n "${_p}" NAME)
  string(APPEND _stamp_text "${_n} ${_h}\n")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_p}")
endforeach()

set(EDGEMERGE_LLAMA_SRC "${CMAKE_BINARY_DIR}/llama.cpp")
set(_stamp "${CMAKE_BINARY_DIR}/llama.cpp.stamp")
set(_old_stamp "")
if(EXISTS "${_stamp}" AND EXISTS "${EDGEMERGE_LLAMA_SRC}/CMakeLists.txt")
  file(READ "${_stamp}" _old_stamp)
endif()

if(NOT _old_stamp STREQUAL _stamp_text)
  message(STATUS "edgemerge: extracting llama.cpp from ${_sdist}")
  set(_x "${CMAKE_BINARY_DIR}/sdist-extract")
  file(REMOVE_RECURSE "${_x}" "${EDGEMERGE_LLAMA_SRC}" "${_stamp}")
  file(ARCHIVE_EXTRACT INPUT "${_sdist}" DESTINATION "${_x}"
       PATTERNS "${_sdist_stem}/vendor/llama.cpp")
  file(RENAME "${_x}/${_sdist_stem}/vendor/llama.cpp" "${EDGEMERGE_LLAMA_SRC}")
  file(REMOVE_RECURSE "${_x}")
  # The vendored tree carries a submodule pointer (.git file); make it a
  # repository of its own so `git apply` resolves paths inside it and never
  # in an enclosing checkout.
  file(REMOVE "${EDGEMERGE_LLAMA_SRC}/.git")
  find_package(Git REQUIRED)
  execute_process(COMMAND "${GIT_EXECUTABLE}" init -q
                  WORKING_DIRECTORY "${EDGEMERGE_LLAMA_SRC}" RESULT_VARIABLE _rc)
  foreach(_p IN LISTS EDGEMERGE_PATCHES)
    get_filename_component(_n "${_p}" NAME)
    execute_process(
      COMMAND "${GIT_EXECUTABLE}" apply --whitespace=nowarn "${_p}"
      WORKING_DIRECTORY "${EDGEMERGE_LLAMA_SRC}"
      RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      file(REMOVE_RECURSE "${EDGEMERGE_LLAMA_SRC}")
      message(FATAL_ERROR "edgemerge: patch ${_n} does not apply to llama.cpp from "
                          "llama-cpp-python ${EDGEMERGE_LLAMA_CPP_PYTHON_VERSION}:\n${_err}")
    endif()
    message(STATUS "edgemerge: applied ${_n}")
  endforeach()
  file(WRITE "${_stamp}" "${_stamp_text}")
endif()
