"""Everything an operator runs against the log: `lag`, `replay` (and `--shadow`), `trace`, `dlq`, `topics`.

Pure decisions and rendering (`lag`, `replay`, `trace`, `dead_letters`, the pure half of `shadow`) are
tested without I/O; `actions` and `reader` talk to the log through services.runtime.ops.OpsLog; the click
commands (`commands`, `dlq`, `topics`) stay thin. Exit codes, for every command here: 0 ok; 1 a finding,
a refusal or a log that refuses (`lag`: a --max-* warning); 2 a usage or configuration mistake (`lag`: a
--critical-* limit); 3 the log cannot be reached within --timeout (services.ops.oneshot).

This package imports schemas and services.runtime only; no service imports it. What it needs of the
router (re-routing one message for `replay --shadow`) is wired in by the composition root, services.cli,
on the command context (services.runtime.context.Reroute).
"""
