// Scratch memory for one call. A small call's buffer is kept by its thread between calls (no
// allocation per call once warm); a large call gets a vector of its own, freed when the call
// ends. Kept whatever its size, one large call would hold that memory in every thread that
// made it, for as long as the thread lives (an eval of a (1, 2^21, 2) input kept 64 MiB).
#pragma once

#include <cstddef>
#include <vector>

namespace batchnorm::detail {

// Largest buffer a thread keeps between calls: a call this large pays for an allocation
// many times over.
constexpr std::size_t kKeptScratchBytes = std::size_t(256) << 10;

// n values of P; Site tells apart the buffers that one thread holds at once (each use site
// has a tag type of its own, so a call may hold several).
template <class P, class Site>
class CallScratch {
public:
    explicit CallScratch(std::size_t n) {
        if (n * sizeof(P) <= kKeptScratchBytes) {
            kept().resize(n);
            data_ = kept().data();
        } else {
            own_.resize(n);
            data_ = own_.data();
        }
    }
    CallScratch(const CallScratch&) = delete;
    CallScratch& operator=(const CallScratch&) = delete;

    P* data() { return data_; }
    // What this thread keeps for Site between calls (tests).
    static std::size_t kept_capacity() { return kept().capacity(); }

private:
    static std::vector<P>& kept() {
        thread_local std::vector<P> buffer;
        return buffer;
    }
    std::vector<P> own_;
    P* data_ = nullptr;
};

}  // namespace batchnorm::detail
