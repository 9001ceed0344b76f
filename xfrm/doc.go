// Package xfrm will read XFRM states and policies over netlink on the
// terminator nodes and turn them into tunnel facts for the director.
package xfrm
