"""The lock-free inter-token histogram is exposed exactly as prometheus-client's own."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import INTER_TOKEN_BUCKETS, GapHistogram

NAME = "gateway_inter_token_latency_seconds"

gaps = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=10, allow_nan=False),
        st.sampled_from(INTER_TOKEN_BUCKETS),  # on a bound: `le` includes it
    ),
    max_size=50,
)


def exposition(registry: CollectorRegistry) -> list[str]:
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if line.startswith(NAME) and "_created" not in line]


@given(sse=gaps, ws=gaps)
def test_same_samples_as_prometheus_client_histogram(sse: list[float], ws: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = GapHistogram(NAME, "Gaps.", "transport", ("sse", "websocket"), INTER_TOKEN_BUCKETS)
    ours.register(fast)
    slow = Histogram(NAME, "Gaps.", ["transport"], buckets=INTER_TOKEN_BUCKETS, registry=theirs)
    for transport, values in (("sse", sse), ("websocket", ws)):
        slow.labels(transport)  # as the app does: every child exists from the start
        for value in values:
            fast.children[transport].observe(value)
            slow.labels(transport).observe(value)
    mine, reference = exposition(ours), exposition(theirs)
    # Sums are added in the same order, so they are equal to the bit.
    assert mine == reference
