"""The parts of the GN+PN benchmark (bench/group_norm_proxy_act.py): cases, providers, timing and
reporting. bench/ holds scripts, not a package: the scripts put bench/ on sys.path."""
