# Used by scripts/demo: writes the pillar's message to the pillar's path.
demo_motd:
  file.managed:
    - name: {{ pillar['path'] }}
    - contents: {{ pillar['motd'] | yaml_encode }}
