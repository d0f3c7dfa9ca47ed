"""Tests of bench/plots.py: the figures its tables print, and the charts drawn from them (run by
tests/benchmarks.rs)."""

import math
import os
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def run(p50, p99, cpu, ok=100, errors=0):
    return {"latency": {"p50": p50, "p90": p50, "p99": p99, "p99.9": p99}, "cpu_us_per_request": cpu,
            "total": 100, "ok": ok, "errors": errors}


# Two rates, two rounds each; seconds, as oha reports them.
RESULTS = {"rates": {
    "200": {"direct": [run(0.0010, 0.0020, 0), run(0.0012, 0.0022, 0)],
            "sidecar": [run(0.0011, 0.0023, 90), run(0.0013, 0.0025, 94)],
            "nginx": [run(0.0011, 0.0024, 70), run(0.0013, 0.0026, 74)]},
    "1000": {"direct": [run(0.0010, 0.0030, 0)] * 2,
             "sidecar": [run(0.0012, 0.0029, 50)] * 2,
             "nginx": [run(0.0011, 0.0033, 40, ok=98)] * 2},
}}


def bars(svg):
    root = ET.fromstring(svg)
    return [(r.get("data-series"), float(r.get("data-value")), float(r.get("y")), float(r.get("height")))
            for r in root.iter(SVG + "rect") if r.get("class") == "bar"]


class Figures(unittest.TestCase):
    def test_added_latency_is_the_proxys_median_minus_the_direct_one_in_milliseconds(self):
        rows = {(r["rate"], r["proxy"]): r for r in plots.figures(RESULTS)}
        sidecar = rows[(200, "sidecar")]
        self.assertAlmostEqual(sidecar["added_ms"][0], 0.1)  # 1.2 ms against 1.1 ms
        self.assertAlmostEqual(sidecar["added_ms"][2], 0.3)
        self.assertEqual(sidecar["cpu_us"], 92)
        self.assertAlmostEqual(rows[(1000, "sidecar")]["added_ms"][2], -0.1, msg="noise may make it negative")
        self.assertEqual(rows[(1000, "nginx")]["errors"], 4)


class Charts(unittest.TestCase):
    def setUp(self):
        self.charts = plots.charts(RESULTS)

    def test_cpu_bars_are_as_tall_as_their_values_on_one_scale(self):
        drawn = bars(self.charts["benchmarks-cpu.svg"])
        self.assertEqual([(s, v) for s, v, _, _ in drawn], [("sidecar", 92), ("nginx", 72), ("sidecar", 50), ("nginx", 40)])
        per_unit = {h / v for _, v, _, h in drawn}
        self.assertTrue(max(per_unit) - min(per_unit) < 1e-3 * max(per_unit), per_unit)

    def test_latency_has_p50_and_p99_of_both_proxies_and_a_negative_bar_hangs_below_the_axis(self):
        drawn = bars(self.charts["benchmarks-latency.svg"])
        self.assertEqual([s for s, _, _, _ in drawn[:4]], ["p50 sidecar", "p50 nginx", "p99 sidecar", "p99 nginx"])
        self.assertEqual(len(drawn), 8)
        (_, up, up_y, up_h), (_, down, down_y, _) = drawn[2], drawn[6]
        self.assertGreater(up, 0)
        self.assertLess(down, 0)
        self.assertGreaterEqual(down_y, up_y + up_h - 0.1, "the negative bar starts at the axis")

    def test_text_names_the_rates_and_the_unit_and_every_chart_is_written(self):
        root = ET.fromstring(self.charts["benchmarks-latency.svg"])
        texts = [t.text for t in root.iter(SVG + "text")]
        for expected in ["200/s", "1,000/s", "milliseconds", "p99 nginx"]:
            self.assertIn(expected, texts)
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(plots.write(RESULTS, d), ["benchmarks-cpu.svg", "benchmarks-latency.svg"])
            for name in os.listdir(d):
                ET.parse(os.path.join(d, name))

    def test_nice_ceilings(self):
        self.assertEqual([plots.nice_ceiling(v) for v in (0.3, 1, 1.2, 2.2, 3, 7, 94)], [0.5, 1, 2, 2.5, 5, 10, 100])
        self.assertTrue(math.isclose(plots.nice_ceiling(0.03), 0.05))


if __name__ == "__main__":
    unittest.main()
