//! The benchmark's charts (bench/plots.py, standard-library Python): bench/test_plots.py checks the
//! figures its tables print and the SVG drawn from them (bars on one scale, negative added latency
//! below the axis, every rate and series named).

use std::process::Command;

#[test]
fn the_benchmark_charts_draw_the_figures_of_its_tables() {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/test_plots.py"))
        .output()
        .expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench/test_plots.py:\n{text}");
    assert!(text.contains("Ran 5 tests") && text.contains("OK"), "{text}");
}
