# One state that succeeds and one that fails, for failure reporting.
steward_ok:
  test.succeed_without_changes: []

steward_fails:
  cmd.run:
    - name: "false"
