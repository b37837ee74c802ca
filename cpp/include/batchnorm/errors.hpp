// Exceptions thrown by batchnorm. Every one derives from std::invalid_argument (bad input) or
// std::runtime_error (an environment that cannot run the request), so callers can catch the
// standard type; the Python bindings map them to ValueError and RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace batchnorm {

// A shape, size or value argument is out of range; the message names the argument.
class invalid_argument : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

// BATCHNORM_ISA names a backend that this CPU or build cannot run.
class unsupported_isa : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

[[noreturn]] inline void fail(const std::string& message) { throw invalid_argument(message); }

// Throws invalid_argument with the parts streamed into one message. The message is built only
// on failure: checks sit on every call's path, and formatting numbers costs more than a small
// call's whole computation.
template <class... Parts>
void require(bool condition, const Parts&... parts) {
    if (condition) return;
    std::ostringstream message;
    (message << ... << parts);
    fail(message.str());
}

}  // namespace detail
}  // namespace batchnorm
