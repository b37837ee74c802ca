// Compiled, not run (.ci/cpp.sh, with -fsyntax-only -Werror and the usual warning flags, by GCC
// and Clang): the public headers included as a user's -I includes them (not as system headers,
// whose warnings compilers hide), with every layer class instantiated for each storage type,
// so that a warning in a template's body shows here before a user's build shows it.
#include <batchnorm/batchnorm.hpp>

#define BATCHNORM_INSTANTIATE(T)                \
    template class batchnorm::BatchNorm<T>;     \
    template class batchnorm::Inference<T>;     \
    template class batchnorm::LayerNorm<T>;     \
    template class batchnorm::RMSNorm<T>;       \
    template class batchnorm::GroupNorm<T>;     \
    template class batchnorm::InstanceNorm<T>;

BATCHNORM_INSTANTIATE(float)
BATCHNORM_INSTANTIATE(double)
BATCHNORM_INSTANTIATE(batchnorm::float16)
BATCHNORM_INSTANTIATE(batchnorm::bfloat16)

int main() {
    // the free functions the layers do not call
    std::vector<batchnorm::GroupStats> stats(1);
    float x[2] = {1.f, 2.f};
    batchnorm::batch_moments(x, batchnorm::Shape{2, 1, 1}, stats.data());
    return 0;
}
