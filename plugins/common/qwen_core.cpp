#include "qwen_core.h"

#include <sstream>

namespace qwen
{

Dims makeDims(std::initializer_list<int64_t> dims)
{
    Dims out;
    for (int64_t d : dims)
    {
        if (out.nbDims < kMaxDims)
        {
            out.d[out.nbDims++] = d;
        }
    }
    return out;
}

int64_t volume(Dims const& dims)
{
    int64_t v = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        v *= dims.d[i];
    }
    return v;
}

std::string toString(Dims const& dims)
{
    std::ostringstream s;
    s << "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        s << (i ? ", " : "") << dims.d[i];
    }
    s << "]";
    return s.str();
}

bool applyRecipe(OutputRecipe const& recipe, Dims const* inputs, int32_t nbInputs, Dims& out, std::string& error)
{
    if (recipe.sameAsInput >= 0)
    {
        if (recipe.sameAsInput >= nbInputs)
        {
            error = "output recipe refers to a missing input";
            return false;
        }
        out = inputs[recipe.sameAsInput];
        return true;
    }
    out = Dims{};
    out.nbDims = recipe.nbDims;
    for (int32_t i = 0; i < recipe.nbDims; ++i)
    {
        DimRecipe const& r = recipe.dims[i];
        if (r.input >= nbInputs || r.input2 >= nbInputs || r.dim >= inputs[r.input].nbDims
            || (r.input2 >= 0 && r.dim2 >= inputs[r.input2].nbDims))
        {
            error = "output recipe refers to a missing input dimension";
            return false;
        }
        int64_t v = inputs[r.input].d[r.dim];
        if (r.input2 >= 0)
        {
            int64_t const v2 = inputs[r.input2].d[r.dim2];
            v = (v < 0 || v2 < 0) ? -1 : v + v2;
        }
        out.d[i] = v;
    }
    return true;
}

void expectShape(char const* what, Dims const& dims, int32_t rank, std::initializer_list<int64_t> expected,
    std::string& error)
{
    std::ostringstream s;
    if (dims.nbDims != rank)
    {
        s << what << " must have rank " << rank << ", got " << toString(dims) << "; ";
        error += s.str();
        return;
    }
    int32_t i = 0;
    for (int64_t e : expected)
    {
        int64_t const a = dims.d[i];
        if (e >= 0 && a >= 0 && a != e)
        {
            s << what << " dim " << i << " is " << a << ", expected " << e << " (shape " << toString(dims) << "); ";
        }
        ++i;
    }
    error += s.str();
}

} // namespace qwen
