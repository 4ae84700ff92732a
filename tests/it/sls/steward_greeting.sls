# Writes the pillar's greeting into the pillar's target file.
steward_greeting:
  file.managed:
    - name: {{ pillar['target_file'] }}
    - contents: {{ pillar['greeting'] | yaml_encode }}
