"""A predictor wrapped with its loss (Chainer's ``L.Classifier``)."""
from kfac_mn import functions as F
from kfac_mn.link import Chain


class Classifier(Chain):
    """Classifier(predictor, lossfun=softmax_cross_entropy, accfun=accuracy).

    ``classifier(*inputs, t)`` runs ``y = predictor(*inputs)`` and returns
    ``lossfun(y, t)``.  The last call's logits, loss and (when
    ``compute_accuracy``) accuracy stay available as ``.y``, ``.loss`` and
    ``.accuracy``, e.g. for logging or for K-FAC's Monte-Carlo Fisher, which
    samples labels from ``.y``.  ``.y`` keeps the graph of that call alive
    until the next call.  The predictor's paths are ``/predictor/...``.
    """

    compute_accuracy = True

    def __init__(self, predictor, lossfun=F.softmax_cross_entropy, accfun=F.accuracy):
        super().__init__()
        self.lossfun = lossfun
        self.accfun = accfun
        self.y = None
        self.loss = None
        self.accuracy = None
        with self.init_scope():
            self.predictor = predictor

    def forward(self, *args):
        if len(args) < 2:
            raise TypeError(
                f"Classifier needs the predictor's inputs and the labels, got {len(args)} "
                "argument(s)")
        *inputs, t = args
        self.y = self.predictor(*inputs)
        self.loss = self.lossfun(self.y, t)
        self.accuracy = self.accfun(self.y, t) if self.compute_accuracy else None
        return self.loss
