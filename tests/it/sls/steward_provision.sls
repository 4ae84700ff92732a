# Applied by the daemon at a server's first start (its model's state).
steward_provisioned:
  test.succeed_with_changes: []
