// Type dispatch over the three storage dtypes the ops accept (float32, float16, bfloat16).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define PID_DISPATCH_FLOATS(TYPE, NAME, ...)                                   \
  [&] {                                                                        \
    switch (TYPE) {                                                            \
      case c10::ScalarType::Float: {                                           \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case c10::ScalarType::Half: {                                            \
        using scalar_t = c10::Half;                                            \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case c10::ScalarType::BFloat16: {                                        \
        using scalar_t = c10::BFloat16;                                        \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE);                \
    }                                                                          \
  }()
