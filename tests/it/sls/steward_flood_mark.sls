# Appends one line per run, so the number of runs can be counted.
steward_flood_mark:
  cmd.run:
    - name: echo ran >> {{ pillar['file'] }}
