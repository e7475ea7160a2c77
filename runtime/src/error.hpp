// Internal exception carrying a timar_status; converted to a status + last-error at the C ABI.
#pragma once

#include <stdexcept>
#include <string>

#include "timar.h"

namespace timar {

struct Error : std::runtime_error {
  timar_status status;
  Error(timar_status s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

}  // namespace timar
