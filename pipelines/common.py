"""Pieces shared by unsee's pipeline classes."""

from __future__ import annotations

from typing import Any


def keep_dtype_from_pipe(base: type) -> classmethod:
    """A ``from_pipe`` that keeps the source pipeline's dtype.

    diffusers' ``from_pipe`` ends with ``new_pipeline.to(dtype=...)`` and defaults that dtype to
    float32, which silently upcasts the (shared) modules of a half-precision pipeline in place
    (diffusers issue #12754). Unless the caller passes ``dtype``/``torch_dtype``, we pass the source
    pipeline's own dtype.
    """

    def from_pipe(cls: type, pipeline: Any, **kwargs: Any) -> Any:
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
            kwargs["dtype"] = pipeline.dtype
        return base.from_pipe.__func__(cls, pipeline, **kwargs)

    from_pipe.__doc__ = base.from_pipe.__doc__
    return classmethod(from_pipe)
