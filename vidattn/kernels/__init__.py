"""vidattn.kernels: backends that execute a BlockPlan (reference, flex, triton) and token-layout ops."""
