{#-
  steward.backup_source: the read-only keys of salt-steward's backup servers
  on a source server, from pillar steward:backup_source (the complete set of
  our entries, with its revision). The work is done by files/apply.py (see
  its head): our lines in authorized_keys (command="rrsync -ro <folder>",
  restrict), others' lines byte for byte; the host's SSH host keys reported.
  Settings (minion config, grains or pillar; config.get):
    steward:backup_source:authorized_keys  /root/.ssh/authorized_keys
    steward:backup_source:rrsync           /usr/bin/rrsync
    steward:backup_source:host_keys_dir    /etc/ssh
-#}
{%- set spec = {
    'pillar': salt['pillar.get']('steward:backup_source', None),
    'settings': {
        'authorized_keys': salt['config.get']('steward:backup_source:authorized_keys', '/root/.ssh/authorized_keys'),
        'rrsync': salt['config.get']('steward:backup_source:rrsync', '/usr/bin/rrsync'),
        'host_keys_dir': salt['config.get']('steward:backup_source:host_keys_dir', '/etc/ssh'),
    },
    'minion': {'id': opts['id']},
} %}
{%- set script = salt['cp.cache_file']('salt://steward/backup_source/files/apply.py', saltenv) %}
{%- if not script %}
steward-backup-source:
  test.fail_without_changes:
    - comment: salt://steward/backup_source/files/apply.py could not be fetched from the master
{%- else %}
steward-backup-source:
  cmd.run:
    - name: {{ grains['pythonexecutable'] | quote }} {{ script | quote }}
    - stdin: {{ spec | json | yaml_dquote }}
    - stateful: True
{%- endif %}
