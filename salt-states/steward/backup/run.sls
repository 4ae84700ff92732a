{#-
  steward.backup.run: runs one backup now on this server (the backup
  server), from pillar steward:backup_run {target, id, level (optional: the
  lowest)}, through the wrapper steward.backup installed
  (<state_dir>/steward-backup-run --state): synchronous, the result JSON in
  the state's output ("result"), the event sent as a cron run sends it. The
  state fails when the outcome is error or attention.
  Settings: steward:backup:state_dir (as steward.backup).
-#}
{%- set run = salt['pillar.get']('steward:backup_run', None) %}
{%- set state_dir = salt['config.get']('steward:backup:state_dir', '/var/lib/salt-steward/backup') %}
{%- set wrapper = state_dir ~ '/steward-backup-run' %}
{%- if run is not mapping %}
steward-backup-run:
  test.fail_without_changes:
    - comment: no pillar steward:backup_run (the dispatcher sends it with state.apply)
{%- elif run.get('target') | string != opts['id'] %}
steward-backup-run:
  test.fail_without_changes:
    - comment: {{ ('pillar steward:backup_run is for ' ~ run.get('target') ~ ', this minion is ' ~ opts['id'] ~ ': refused') | yaml_dquote }}
{%- elif not salt['file.file_exists'](wrapper) %}
steward-backup-run:
  test.fail_without_changes:
    - comment: {{ (wrapper ~ ' is missing: steward.backup has not been applied on this server') | yaml_dquote }}
{%- else %}
steward-backup-run:
  cmd.run:
    - name: {{ wrapper | quote }} --state --id {{ run.get('id') | string | quote }}{% if run.get('level') %} --level {{ run.get('level') | string | quote }}{% endif %}
    - stateful: True
{%- endif %}
