// SHA-256 (FIPS 180-4), small and dependency-free: the bundle's file hashes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace timar {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();   // finishes; the object is spent afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

// Lower-case hex digest of a file; throws std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace timar
