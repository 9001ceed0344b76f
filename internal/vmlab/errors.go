package vmlab

import "errors"

func asMissing(err error, m **MissingError) bool { return errors.As(err, m) }
