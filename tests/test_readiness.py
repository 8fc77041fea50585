"""The BLS's readiness answer (models/readiness.py): what Triton 26.03+ gets from its is_ready()."""

from __future__ import annotations

from flux2_serving.models.readiness import Readiness


def test_a_dead_component_makes_the_bls_not_ready_until_a_call_succeeds_or_the_hold_passes():
    now = [100.0]
    readiness = Readiness(hold_s=30.0, clock=lambda: now[0])
    assert readiness.ready()
    readiness.component_died("transformer_cached")
    assert not readiness.ready() and readiness.dead_component == "transformer_cached"
    now[0] += 29.9
    assert not readiness.ready()
    readiness.call_succeeded()  # the component answered again (reloaded): ready at once
    assert readiness.ready()
    readiness.component_died("vae_decoder")
    now[0] += 30.0  # nobody sent a request since: ready again by itself, not stuck
    assert readiness.ready()
