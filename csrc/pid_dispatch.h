// Type dispatch over the three storage dtypes the ops accept (float32, float16, bfloat16).
#pragma once

#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <stdexcept>

#define PID_DISPATCH_FLOATS(TYPE, NAME, ...)                                   \
  [&] {                                                                        \
    switch (TYPE) {                                                            \
      case torch::headeronly::ScalarType::Float: {                             \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case torch::headeronly::ScalarType::Half: {                              \
        using scalar_t = torch::headeronly::Half;                              \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case torch::headeronly::ScalarType::BFloat16: {                          \
        using scalar_t = torch::headeronly::BFloat16;                          \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        throw std::runtime_error(std::string(NAME) + ": unsupported dtype " +  \
                                 torch::headeronly::toString(TYPE));           \
    }                                                                          \
  }()
