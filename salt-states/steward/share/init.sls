{#-
  steward.share: the samba shares of one samba server, from pillar
  steward:share (the complete desired set, with its revision). The work is
  done by files/apply.py (see its head): folders contained in base, one system
  user per share, passdb entries from the NT hashes (encrypted to this
  minion's key, decrypted on the minion), one shares file validated by
  testparm before it is written, included from smb.conf, smbd reloaded;
  users and shares that left the pillar removed (their data stays).
  Settings (minion config, grains or pillar; config.get):
    steward:share:smb_conf       /etc/samba/smb.conf
    steward:share:shares_file    /etc/samba/salt-steward-shares.conf
    steward:share:state_dir      /var/lib/salt-steward/share
    steward:share:minion_key     <pki_dir>/minion.pem
    steward:share:testparm       testparm
    steward:share:pdbedit        pdbedit
    steward:share:smbcontrol     smbcontrol
    steward:share:useradd        useradd
    steward:share:userdel        userdel
    steward:share:nologin        /usr/sbin/nologin
    steward:share:share_options  {}   (extra parameters of every share section)
-#}
{%- set spec = {
    'pillar': salt['pillar.get']('steward:share', None),
    'minion_id': grains['id'],
    'settings': {
        'smb_conf': salt['config.get']('steward:share:smb_conf', '/etc/samba/smb.conf'),
        'shares_file': salt['config.get']('steward:share:shares_file', '/etc/samba/salt-steward-shares.conf'),
        'state_dir': salt['config.get']('steward:share:state_dir', '/var/lib/salt-steward/share'),
        'minion_key': salt['config.get']('steward:share:minion_key', opts['pki_dir'] ~ '/minion.pem'),
        'testparm': salt['config.get']('steward:share:testparm', 'testparm'),
        'pdbedit': salt['config.get']('steward:share:pdbedit', 'pdbedit'),
        'smbcontrol': salt['config.get']('steward:share:smbcontrol', 'smbcontrol'),
        'useradd': salt['config.get']('steward:share:useradd', 'useradd'),
        'userdel': salt['config.get']('steward:share:userdel', 'userdel'),
        'nologin': salt['config.get']('steward:share:nologin', '/usr/sbin/nologin'),
        'share_options': salt['config.get']('steward:share:share_options', {}),
    },
} %}
{%- set script = salt['cp.cache_file']('salt://steward/share/files/apply.py', saltenv) %}
{%- if not script %}
steward-share:
  test.fail_without_changes:
    - comment: salt://steward/share/files/apply.py could not be fetched from the master
{%- else %}
steward-share:
  cmd.run:
    - name: {{ grains['pythonexecutable'] | quote }} {{ script | quote }}
    - stdin: {{ spec | json | yaml_dquote }}
    - stateful: True
{%- endif %}
