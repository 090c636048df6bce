"""The capacity planner's simulator: the service's scheduling core in virtual time.

`sim.engine` is the pure discrete-event engine; `sim.scenario` reads TOML scenarios;
`sim.report`, `sim.plots`, `sim.sweep` and `sim.compare` turn runs into answers; `sim.cli`
is the command line (`python -m sim`, `scheduler sim`).
"""
