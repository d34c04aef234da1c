"""twistd plugin: C{twistd -n dgproxy --config FILE}."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to the dgproxy YAML config file "
                              "(default: $DGP_CONFIG, ./dgproxy.yaml, /etc/dgproxy/dgproxy.yaml)."],
    ]


@implementer(IServiceMaker, IPlugin)
class DGProxyServiceMaker:
    tapname = "dgproxy"
    description = "Delta-compressing S3 proxy."
    options = Options

    def makeService(self, options):
        from dgproxy.service import make_service
        return make_service(options["config"])


serviceMaker = DGProxyServiceMaker()
