"""Software prefetch for the compiled kernels: ask for a weight stream's cache lines before the loads need them."""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# Bytes per cache line: one prefetch brings in this many.
LINE = 64


@intrinsic
def prefetch(typingctx, array, index):
    """A read hint (llvm.prefetch, kept in every cache level) for the line holding array[index] of a 1-D array.

    One core streaming weights from memory waits on the hardware prefetcher, which runs only a little ahead;
    explicit hints a few kilobytes ahead keep more lines in flight. A hint changes no value and never faults.
    """
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        arrayty = signature.args[0]
        data = context.make_array(arrayty)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, arrayty, data, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [pointer, i32(0), i32(3), i32(1)])  # read, highest locality, data cache
        return context.get_dummy_value()

    return types.void(array, index), codegen
