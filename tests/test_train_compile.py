"""``train.compile=true``: the compiled training step keeps the maths of the eager reference.

torch.compile (``nn.Module.compile`` of G and every D, inductor) must run the same SPSR-G step as
the public code's structure: G with the fused gradient map, two discriminators with BatchNorm,
D(real) computed once for both steps (its running averages counted twice). D(fake) runs twice
when compiled (``Trainer._micro_step``): once-for-both-steps backpropagates D's graph twice, which
AOT autograd refuses (donated buffers) and, with donation off, inductor's CPU backward got wrong
on the second pass. Before that fallback this test failed at the first step with "This backward
function was compiled with non-empty donated buffers ...".
"""

from __future__ import annotations

import pytest
from test_train_speed import _compare


@pytest.mark.slow  # compiles a tiny G and two Ds with inductor on the CPU (~75 s on 2 cores)
def test_compiled_step_equals_reference(tmp_path):
    _compare(tmp_path, "train.compile=true")
