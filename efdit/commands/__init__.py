"""The `efdit` commands, one module per command (`efdit.cli` dispatches to their `main(argv)`), the web page and
its backends, the demo, the ablation and the reports. Nothing imports this layer."""
