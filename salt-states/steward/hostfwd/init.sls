{#-
  steward.hostfwd: the hostname forwards of the nginx proxy, from pillar
  steward:hostfwd (the complete desired set, with its revision). The work is
  done by files/apply.py (see its head): one site file for all our domains,
  swapped in, the full `nginx -t` run, the previous file restored byte for
  byte on a failure or a "conflicting server name" warning, reload after a pass.
  Settings (minion config, grains or pillar; config.get):
    steward:hostfwd:nginx           /usr/sbin/nginx
    steward:hostfwd:nginx_args      (none)  e.g. "-p PREFIX -c PREFIX/nginx.conf"
    steward:hostfwd:site_file       /etc/nginx/conf.d/salt-steward-hostfwd.conf
    steward:hostfwd:listen_address  (none: every address)
-#}
{%- set spec = {
    'pillar': salt['pillar.get']('steward:hostfwd', None),
    'settings': {
        'nginx': salt['config.get']('steward:hostfwd:nginx', '/usr/sbin/nginx'),
        'nginx_args': salt['config.get']('steward:hostfwd:nginx_args', ''),
        'site_file': salt['config.get']('steward:hostfwd:site_file', '/etc/nginx/conf.d/salt-steward-hostfwd.conf'),
        'listen_address': salt['config.get']('steward:hostfwd:listen_address', ''),
    },
} %}
{%- set script = salt['cp.cache_file']('salt://steward/hostfwd/files/apply.py', saltenv) %}
{%- if not script %}
steward-hostfwd:
  test.fail_without_changes:
    - comment: salt://steward/hostfwd/files/apply.py could not be fetched from the master
{%- else %}
steward-hostfwd:
  cmd.run:
    - name: {{ grains['pythonexecutable'] | quote }} {{ script | quote }}
    - stdin: {{ spec | json | yaml_dquote }}
    - stateful: True
{%- endif %}
