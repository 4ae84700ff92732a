# Records the deployed version (from the rule's pillar) in a file named after the minion.
steward_deploy:
  file.managed:
    - name: {{ pillar['deploy_dir'] }}/deployed-{{ grains['id'] }}.txt
    - contents: "version {{ pillar['version'] }}"
