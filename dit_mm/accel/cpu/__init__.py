"""The CPU executor: oneDNN GEMMs and convolutions with reordered weights
(:mod:`.onednn`), the sparse depthwise-conv kernels (:mod:`.sparse_ops`) and
the packed stage as one C++ call (:mod:`.native_stage`); C++ sources in
``csrc/``."""
