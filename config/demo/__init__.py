"""The demo: `python -m config.demo` (what `make demo` runs), its seeds and the screenshots.

- `config.demo.__main__`: the whole system on one machine with a simulated fleet;
  `python -m config.demo seed` only registers the demo models and data sets.
- `config.demo.seed`: every row the demo, the screenshots, the benchmarks and the tests
  seed: the admin, the registry's demo models and data sets, the demo fleet's group,
  policy and token, the demo federated job, the scratch sample fleet.
- `config.demo.screenshots`: screenshots of the dashboard's main pages.
"""
