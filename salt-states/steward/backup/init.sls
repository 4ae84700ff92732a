{#-
  steward.backup: the backups this server (the backup server) pulls, from
  pillar steward:backup (the complete desired set, with its revision). The
  work is done by files/apply.py (see its head): the SSH key generated once,
  the sources' host keys, one rsnapshot config per backup checked with
  configtest, dedicated destination folders, the wrapper files/run.py
  installed as <state_dir>/steward-backup-run, one cron file.
  Settings (minion config, grains or pillar; config.get):
    steward:backup:state_dir   /var/lib/salt-steward/backup
    steward:backup:cron_file   /etc/cron.d/salt-steward-backup
    steward:backup:rsnapshot   /usr/bin/rsnapshot
    steward:backup:rsync       /usr/bin/rsync
    steward:backup:ssh         /usr/bin/ssh
    steward:backup:ssh_keygen  /usr/bin/ssh-keygen
    steward:backup:salt_call   salt-call beside the minion's Python, else salt-call
-#}
{%- set script = salt['cp.cache_file']('salt://steward/backup/files/apply.py', saltenv) %}
{%- set wrapper = salt['cp.cache_file']('salt://steward/backup/files/run.py', saltenv) %}
{%- set spec = {
    'pillar': salt['pillar.get']('steward:backup', None),
    'settings': {
        'state_dir': salt['config.get']('steward:backup:state_dir', '/var/lib/salt-steward/backup'),
        'cron_file': salt['config.get']('steward:backup:cron_file', '/etc/cron.d/salt-steward-backup'),
        'rsnapshot': salt['config.get']('steward:backup:rsnapshot', '/usr/bin/rsnapshot'),
        'rsync': salt['config.get']('steward:backup:rsync', '/usr/bin/rsync'),
        'ssh': salt['config.get']('steward:backup:ssh', '/usr/bin/ssh'),
        'ssh_keygen': salt['config.get']('steward:backup:ssh_keygen', '/usr/bin/ssh-keygen'),
        'salt_call': salt['config.get']('steward:backup:salt_call', ''),
    },
    'minion': {
        'id': opts['id'],
        'conf_dir': salt['file.dirname'](opts['conf_file']),
    },
    'wrapper_source': wrapper,
} %}
{%- if not script or not wrapper %}
steward-backup:
  test.fail_without_changes:
    - comment: salt://steward/backup/files/apply.py or run.py could not be fetched from the master
{%- else %}
steward-backup:
  cmd.run:
    - name: {{ grains['pythonexecutable'] | quote }} {{ script | quote }}
    - stdin: {{ spec | json | yaml_dquote }}
    - stateful: True
{%- endif %}
