"""vidattn.quality: sparse-vs-dense quality harness (metrics, probes, comparison runner, reports)."""
