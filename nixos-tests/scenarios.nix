# The shared scenario scripts as an importable `tests.e2e.scenarios` package in the store (only
# that directory, so editing anything else in tests/ does not change the VM tests).
hostPkgs:

hostPkgs.runCommand "guixsvc-scenarios" { } ''
  mkdir -p $out/tests/e2e
  cp -r ${
    builtins.path {
      name = "scenarios";
      path = ../tests/e2e/scenarios;
      filter = path: _type: baseNameOf path != "__pycache__";
    }
  } $out/tests/e2e/scenarios
  touch $out/tests/__init__.py $out/tests/e2e/__init__.py
''
