"""Running one encoder through ONNX Runtime IO binding.

With a GPU provider, `session.run` with numpy inputs copies the batch to
the device inside the run and allocates the output anew each time. Bound
runs take the input as an OrtValue already on the session's device (made
by `stage`, which the batcher may call outside the run) and write the
output into a host buffer ORT keeps bound. On CPU the same code path runs
(the "device" is host memory): tests use it to check that bound runs give
exactly the embeddings plain runs give.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort


class BoundEncoder:
    """One input, one output, run through IO binding on `device` ('cpu' or
    'cuda'). Called from one thread (the batcher's runner)."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str,
                 device: str = "cpu", device_id: int = 0) -> None:
        self._session = session
        self._input = input_name
        self._output = output_name
        self.device = device
        self._device_id = device_id

    def stage(self, x: np.ndarray) -> ort.OrtValue:
        """The batch as an OrtValue on the session's device (the host-to-device
        copy happens here)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device, self._device_id)

    def run(self, x: np.ndarray | ort.OrtValue) -> np.ndarray:
        staged = x if isinstance(x, ort.OrtValue) else self.stage(x)
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self._input, staged)
        binding.bind_output(self._output, "cpu")  # embeddings are small: straight to host memory
        self._session.run_with_iobinding(binding)
        out: Any = binding.copy_outputs_to_cpu()[0]
        return np.asarray(out)
