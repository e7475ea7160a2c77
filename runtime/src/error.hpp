// Internal exception carrying a timar_status; converted to a status + last-error at the C ABI.
#pragma once

#include <new>
#include <stdexcept>
#include <string>

#include "timar.h"

namespace timar {

struct Error : std::runtime_error {
  timar_status status;
  Error(timar_status s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

// The status and message of the exception being handled: call only inside a catch block.
struct Failure {
  timar_status status;
  std::string message;
};
inline Failure current_failure() {
  try {
    throw;
  } catch (const Error& e) {
    return {e.status, e.what()};
  } catch (const std::bad_alloc&) {
    return {TIMAR_ERR_OUT_OF_MEMORY, "out of memory"};
  } catch (const std::invalid_argument& e) {
    return {TIMAR_ERR_INVALID_ARGUMENT, e.what()};
  } catch (const std::exception& e) {
    return {TIMAR_ERR_INTERNAL, std::string("internal error: ") + e.what()};
  } catch (...) {
    return {TIMAR_ERR_INTERNAL, "internal error: unknown exception"};
  }
}

}  // namespace timar
