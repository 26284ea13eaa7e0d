"""The fault proxy's plan: faults at fixed exchanges, counted among those it can fault."""

from __future__ import annotations

from tests.support.faultproxy import FaultPlan, FaultProxy


def test_fixed_points_fault_exactly_there_and_count_only_what_can_be_faulted() -> None:
    proxy = FaultProxy("127.0.0.1", 1, FaultPlan(faults=("corrupt_request",), at=(1, 3, 5)))
    exchanges = [(b"PUT /b/k1 HTTP/1.1", True), (b"GET /b/k1 HTTP/1.1", False),
                 (b"PUT /b/k2 HTTP/1.1", True), (b"PUT /b/k3 HTTP/1.1", True),
                 (b"HEAD /b/k3 HTTP/1.1", False), (b"PUT /b/k4 HTTP/1.1", True),
                 (b"PUT /b/k5 HTTP/1.1", True), (b"PUT /b/k6 HTTP/1.1", True),
                 (b"PUT /b/k7 HTTP/1.1", True)]
    drawn = [proxy._draw(line, has_body) for line, has_body in exchanges]
    # Bodiless exchanges cannot carry a damaged request and are not counted.
    assert drawn == ["corrupt_request", None, None, "corrupt_request", None, None,
                     "corrupt_request", None, None]
    assert proxy.injected["corrupt_request"] == 3


def test_fixed_points_come_on_top_of_the_rate_and_respect_only() -> None:
    plan = FaultPlan(faults=("error",), only=("/chunks/",), at=(2,))
    proxy = FaultProxy("127.0.0.1", 1, plan)
    lines = [b"GET /b/config HTTP/1.1", b"GET /b/chunks/a HTTP/1.1",
             b"GET /b/manifests/m HTTP/1.1", b"GET /b/chunks/b HTTP/1.1",
             b"GET /b/chunks/c HTTP/1.1"]
    assert [proxy._draw(line, False) for line in lines] == [None, None, None, "error", None]
    plan.rate = 1.0
    assert proxy._draw(b"GET /b/chunks/d HTTP/1.1", False) == "error"
    assert proxy._draw(b"GET /b/other HTTP/1.1", False) is None
