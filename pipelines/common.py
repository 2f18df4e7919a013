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


class ErasureCallMixin:
    """Runs each pipeline call with the loaded erasure adapters' per-call behaviour.

    Adapters with Facilitated Transport (SPM) take their strength for the call's prompt
    (``ErasureAdapterMixin._erasure_transport``); guidance and diffusers' own call run inside.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prompt = kwargs.get("prompt", args[0] if args else None)
        with self._erasure_transport(prompt):
            return super().__call__(*args, **kwargs)
