"""What ships with the core and runs without the test kit.

Plugins loaded through the same entry points as external ones: `file` and `exec` (sinks) and
`memory` (the simulated sources `memory` and `keydir` and the `recording` sink, for the demo,
tests and benchmarks). Beside them, `program` (the runner for admin programs every plugin
shares, exported as `qkdagent.run_program`) and `loopback` (the configs of an alice/bob pair on
loopback, used by `qkdagent demo` and `qkdagent.testing.open_agent_pair`).
"""
