"""``openstack imageupdate ...``: imageupdate as a python-openstackclient plugin (the second front door).

:mod:`imageupdate.osc.plugin` is what ``openstack.cli.extension`` names; :mod:`imageupdate.osc.commands`
holds one cliff command class per command of :mod:`imageupdate.commands`, each named in setup.cfg's
``openstack.imageupdate.v1`` entry points."""
