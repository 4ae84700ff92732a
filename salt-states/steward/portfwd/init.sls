{#-
  steward.portfwd: the port forwards of one Proxmox host, from pillar
  steward:portfwd (the complete desired set, with its revision). The work is
  done by files/apply.py (see its head): one nftables table of our own,
  checked with nft -c before it replaces the live file, loaded in one
  transaction; IPv4 forwarding; conntrack of changed UDP forwards; boot unit.
  Settings (minion config, grains or pillar; config.get):
    steward:portfwd:config_dir   /etc/salt-steward
    steward:portfwd:nft          nft
    steward:portfwd:conntrack    conntrack
    steward:portfwd:sysctl_conf  /etc/sysctl.d/90-salt-steward-portfwd.conf
    steward:portfwd:unit_dir     /etc/systemd/system
-#}
{%- set spec = {
    'pillar': salt['pillar.get']('steward:portfwd', None),
    'settings': {
        'config_dir': salt['config.get']('steward:portfwd:config_dir', '/etc/salt-steward'),
        'nft': salt['config.get']('steward:portfwd:nft', 'nft'),
        'conntrack': salt['config.get']('steward:portfwd:conntrack', 'conntrack'),
        'sysctl_conf': salt['config.get']('steward:portfwd:sysctl_conf', '/etc/sysctl.d/90-salt-steward-portfwd.conf'),
        'unit_dir': salt['config.get']('steward:portfwd:unit_dir', '/etc/systemd/system'),
    },
} %}
{%- set script = salt['cp.cache_file']('salt://steward/portfwd/files/apply.py', saltenv) %}
{%- if not script %}
steward-portfwd:
  test.fail_without_changes:
    - comment: salt://steward/portfwd/files/apply.py could not be fetched from the master
{%- else %}
steward-portfwd:
  cmd.run:
    - name: {{ grains['pythonexecutable'] | quote }} {{ script | quote }}
    - stdin: {{ spec | json | yaml_dquote }}
    - stateful: True
{%- endif %}
